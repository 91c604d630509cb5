"""The one torch.library namespace every fx_passes op lives in."""
LIB_NAMESPACE = "fx_passes"
