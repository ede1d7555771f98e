"""The public ops: argument checks, torch.library registration, autograd and backend dispatch."""
