"""Understanding the detector (paper §3.1, §3.3, Figures 2–6): warped samples, top
activations of pool5 units, false-positive analysis, sensitivity analysis, one report."""
