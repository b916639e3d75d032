"""Making models to run: offline assets (weights and texts from package registries) and MoEfication of dense
checkpoints into SmolMoE and CoderMoE."""
