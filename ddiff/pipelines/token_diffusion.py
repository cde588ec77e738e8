"""Placeholder: being written."""


class TokenDiffusionPipeline:
    pass


class TokenDiffusionPipelineOutput:
    pass
