"""Importing this package registers the timm entrypoints overlock_{xt,t,s,b} and test_overlock."""
from .overlock import ARCHS, OverLoCK, checkpoint_filter_fn, dense_channels, extended_no_weight_decay, get_arch

__all__ = ['ARCHS', 'OverLoCK', 'checkpoint_filter_fn', 'dense_channels', 'extended_no_weight_decay', 'get_arch']
