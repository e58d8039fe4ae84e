"""Stage 1, make a model quantization-aware: fx trace, in-place ops out, dedupe, fuse, insert fake
quantizers by config; calibrate; save and load checkpoints; build models from factories."""
