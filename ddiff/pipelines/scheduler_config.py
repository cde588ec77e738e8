"""Saving and loading a scheduler's ``config`` (``scheduler_config.json``), shared by every
ddiff scheduler, in the layout diffusers' ``ConfigMixin`` reads and writes."""

from __future__ import annotations

import inspect
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
        tmp = f"{path}.tmp-{os.getpid()}"  # written whole, then renamed: never a half-written config
        try:
            with open(tmp, "w") as f:
                json.dump(self.to_dict(), f, indent=2, sort_keys=True)
                f.write("\n")
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return path

    @classmethod
    def from_config(cls, config: Union[dict, str, os.PathLike], **overrides):
        """From a dict, a JSON file, or a directory holding ``scheduler_config.json``; keys
        starting with ``_`` (class name, version) are metadata and are ignored.

        From a file, errors name it: :class:`~ddiff.pipelines.loading.CheckpointNotFoundError`
        (a ``FileNotFoundError``) when it is absent, ``ValueError`` with the line for corrupt JSON
        or naming a required constructor argument that is missing, and the constructor's own
        ``TypeError`` / ``ValueError`` prefixed with the file."""
        if isinstance(config, dict):
            kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
            kwargs.update(overrides)
            return cls(**kwargs)
        from ddiff.pipelines.loading import _with_context, read_json

        path = os.fspath(config)
        if os.path.isdir(path):
            path = os.path.join(path, cls.config_name)
        data = read_json(path, what=f"{cls.__name__} config")
        kwargs = {k: v for k, v in data.items() if not k.startswith("_")}
        kwargs.update(overrides)
        missing = [name for name, p in inspect.signature(cls.__init__).parameters.items()
                   if name != "self" and p.default is inspect.Parameter.empty
                   and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and name not in kwargs]
        if missing:
            raise ValueError(f"{path} is missing the required key{'s' if len(missing) > 1 else ''} "
                             f"{', '.join(f'`{k}`' for k in missing)} ({cls.__name__} needs it).")
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise _with_context(e, path) from e

    @classmethod
    def from_pretrained(cls, config: Union[dict, str, os.PathLike], **overrides):
        return cls.from_config(config, **overrides)
