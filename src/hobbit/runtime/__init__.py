"""The runtime: engine and sequence, the model, the expert provider with its slot pools, loader and scheduler.

Imports store/ (to read weights) and policies/ (torch-free decisions); never lab/, models/ or serve/.
"""
