"""Single-machine simulations over Flower's Simulation Engine."""
