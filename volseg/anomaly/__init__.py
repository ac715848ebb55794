"""Anomaly maps: a 3D convolutional autoencoder trained on healthy brains, median-filtered
residual maps, thresholds calibrated on healthy data, and their evaluation."""
