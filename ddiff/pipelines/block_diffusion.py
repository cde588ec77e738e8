"""Placeholder: being written."""


class BlockDiffusionPipeline:
    pass


class BlockDiffusionPipelineOutput:
    pass
