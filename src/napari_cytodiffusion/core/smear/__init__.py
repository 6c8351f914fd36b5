"""Image-side building blocks: image -> prepared smear -> cells -> normalised crops."""
