"""One module per op: its Triton kernels, launcher, torch.library registration and public function."""
