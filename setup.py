from setuptools import find_packages, setup

setup(
    name="oneword",
    version="0.1.0",
    description="Textual Inversion (Gal et al. 2022) on hand-written latent diffusion, in PyTorch",
    python_requires=">=3.10",
    packages=find_packages(include=["ldm", "ldm.*", "inversion", "inversion.*", "weights",
                                    "experiments", "experiments.*", "apps", "apps.*"]),
    install_requires=[
        "torch>=2.1", "open_clip_torch>=2.20", "einops", "numpy", "pillow", "safetensors",
        "tqdm", "matplotlib",
    ],
    extras_require={
        "gpu": ["triton"],
        "ui": ["gradio>=6.31,<7"],
        "test": ["pytest", "ruff", "hypothesis", "triton", "diffusers==0.42.1",
                 "transformers>=5", "tokenizers", "scikit-image", "playwright>=1.65,<2"],
    },
)
