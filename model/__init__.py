"""mugs.model: the ViT backbone with the relation block, the heads, the losses, the ring buffers (queues,
memories), the student/teacher network, the FLOP model, converters."""
