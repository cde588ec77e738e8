"""Thin pipelines over ddiff.ops: they hold no sampling logic of their own."""

from ddiff.pipelines.block_diffusion import BlockDiffusionPipeline, BlockDiffusionPipelineOutput
from ddiff.pipelines.dflash import DFlashPipeline, DFlashPipelineOutput
from ddiff.pipelines.dflash_model import DFlashDraftModel
from ddiff.pipelines.token_diffusion import TokenDiffusionPipeline, TokenDiffusionPipelineOutput

__all__ = ["BlockDiffusionPipeline", "BlockDiffusionPipelineOutput", "DFlashDraftModel", "DFlashPipeline",
           "DFlashPipelineOutput", "TokenDiffusionPipeline", "TokenDiffusionPipelineOutput"]
