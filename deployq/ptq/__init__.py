"""Post-training quantization methods beyond calibration: what a user applies to a float model (or a
prepared, calibrated one) when there is no time or data for QAT.

    equalize      cross-layer equalization of the float model (Nagel et al., ICCV 2019)
    zeroq         data-free calibration inputs matched to BatchNorm statistics (Cai et al., CVPR 2020)
    adaround      learned up/down rounding of the weights (Nagel et al., ICML 2020)
    bias_correction   the quantized layers' expected output error subtracted from their bias

Each leaves the model in the state the exporter already reads (float weights whose rounding is the
chosen one, qparams in the quantizers), so export and ``deployq check`` stay exact.
"""
