"""Row quantization of float16 KV at rest: the native kernels (native/) and their numpy
reference, which defines the stored format."""
