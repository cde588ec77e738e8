"""Saving and loading a scheduler's ``config`` (``scheduler_config.json``), shared by every
ddiff scheduler, in the layout diffusers' ``ConfigMixin`` reads and writes."""

from __future__ import annotations

import json
import os
from typing import Union

SCHEDULER_CONFIG_NAME = "scheduler_config.json"


class SchedulerConfigMixin:
    """A scheduler whose constructor arguments are exactly ``self.config``."""

    config_name = SCHEDULER_CONFIG_NAME
    config: dict

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.config.items())})"

    def to_dict(self) -> dict:
        import ddiff

        return dict(self.config, _class_name=type(self).__name__, _ddiff_version=ddiff.__version__)

    def save_config(self, save_directory: Union[str, os.PathLike]) -> str:
        """Write ``scheduler_config.json`` into ``save_directory``; returns its path."""
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, self.config_name)
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")
        return path

    @classmethod
    def from_config(cls, config: Union[dict, str, os.PathLike], **overrides):
        """From a dict, a JSON file, or a directory holding ``scheduler_config.json``; keys
        starting with ``_`` (class name, version) are metadata and are ignored."""
        if not isinstance(config, dict):
            path = os.fspath(config)
            if os.path.isdir(path):
                path = os.path.join(path, cls.config_name)
            with open(path) as f:
                config = json.load(f)
        kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, config: Union[dict, str, os.PathLike], **overrides):
        return cls.from_config(config, **overrides)
