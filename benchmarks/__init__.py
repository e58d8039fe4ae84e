"""deployq's benchmarks against its peers, in one harness.

    python benchmarks/run_all.py [--quick]        # every benchmark -> BENCHMARKS.md

| module            | what it measures                                                              |
|-------------------|-------------------------------------------------------------------------------|
| bench_lowlight    | PSNR / SSIM of the low-light example: float, deployq QAT, ORT quantize_static |
| bench_digits      | accuracy on scikit-learn's digits: deployq QAT/PTQ, quantize_static, torch.ao |
| bench_parity      | torch fake-quant vs ORT codes (reference view), integer kernels vs reference  |
| bench_speed       | int8/fp32 latency, QAT/float step time, export time, diff vs Polygraphy       |
| bench_scale       | export and diff time against model depth                                      |
| bench_hessian     | Hessian-trace time per layer and iterations to converge                       |

Each module runs alone too (``python -m benchmarks.bench_parity --help``) and writes its section
to ``benchmarks/results/``. Peers (Polygraphy, scikit-learn) come from the ``[bench]`` extra.
"""
