"""Graph analyses that passes build on (read-only: they never edit the graph)."""
from .channels import ChannelAnalysis, ChannelGroup, analyze_channels

__all__ = ["ChannelAnalysis", "ChannelGroup", "analyze_channels"]
