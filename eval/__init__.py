"""mugs.eval: k-NN and linear evaluation, checkpoint import/export, pictures."""
