from .dwconv import dilate_and_pad, dw_conv2d, dw_weight_grad
from .grn import grn
from .neighborhood import na2d_av, na2d_av_reference, na2d_av_unfold, rpb_bias, window_starts

__all__ = ['dilate_and_pad', 'dw_conv2d', 'dw_weight_grad', 'grn', 'na2d_av', 'na2d_av_reference', 'na2d_av_unfold',
           'rpb_bias', 'window_starts']
