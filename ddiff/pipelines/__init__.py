"""Thin pipelines over ddiff.ops: they hold no sampling logic of their own."""

from ddiff.pipelines.block_diffusion import BlockDiffusionPipeline, BlockDiffusionPipelineOutput
from ddiff.pipelines.block_diffusion_scheduler import BlockDiffusionScheduler, BlockDiffusionSchedulerOutput
from ddiff.pipelines.dflash import DFlashPipeline, DFlashPipelineOutput
from ddiff.pipelines.dflash_model import DFlashDraftModel
from ddiff.pipelines.token_diffusion import TokenDiffusionPipeline, TokenDiffusionPipelineOutput
from ddiff.pipelines.token_diffusion_scheduler import TokenDiffusionScheduler

__all__ = ["BlockDiffusionPipeline", "BlockDiffusionPipelineOutput", "BlockDiffusionScheduler",
           "BlockDiffusionSchedulerOutput", "DFlashDraftModel", "DFlashPipeline",
           "DFlashPipelineOutput", "TokenDiffusionPipeline", "TokenDiffusionPipelineOutput", "TokenDiffusionScheduler"]
