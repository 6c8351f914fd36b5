"""The class-conditional diffusion model: UNet, noise schedule and samplers."""
