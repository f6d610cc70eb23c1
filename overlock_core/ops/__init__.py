from .dwconv import SpectralGrads, dense_dilated, dilate_and_pad, dw_conv2d, dw_weight_grad
from .grn import grn
from .neighborhood import kernel_av, na2d_av, na2d_av_reference, na2d_av_unfold, rpb_bias, window_starts
from .recompute import bn_act, bn_branch_sum, conv_mlp, dw_bn_act_conv, gated_bn_conv, image_groups

__all__ = ['SpectralGrads', 'bn_act', 'bn_branch_sum', 'conv_mlp', 'dense_dilated', 'dilate_and_pad',
           'dw_bn_act_conv', 'dw_conv2d', 'dw_weight_grad', 'gated_bn_conv', 'grn', 'image_groups', 'kernel_av',
           'na2d_av', 'na2d_av_reference', 'na2d_av_unfold', 'rpb_bias', 'window_starts']
