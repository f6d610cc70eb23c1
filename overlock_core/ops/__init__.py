from .neighborhood import na2d_av, na2d_av_reference, na2d_av_unfold, rpb_bias, window_starts

__all__ = ['na2d_av', 'na2d_av_reference', 'na2d_av_unfold', 'rpb_bias', 'window_starts']
