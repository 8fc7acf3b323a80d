"""llfc: linear mode connectivity (LMC) and layerwise linear feature connectivity (LLFC).

Convention used everywhere: θ_α = α·θ_A + (1−α)·θ_B, so α = 1 is model A and α = 0 is model B
(Zhou et al., NeurIPS 2023, §2).
"""

__version__ = "0.1.0"
