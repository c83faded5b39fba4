"""Analyses of trained models beyond accuracy ("Noise or Signal" §4-5).

    adversarial   the worst background per foreground (`bgjax adversarial`)
    saliency      Grad-CAM / input-gradient share on the foreground (`bgjax saliency`)
    compare       evaluated workdirs side by side (`bgjax compare`)

Per-variant accuracy, BG-gap, groups and the fg/bg bucket table live in `bgjax.metrics` and
`bgjax.evaluate` (`bgjax eval`).
"""
