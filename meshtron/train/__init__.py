"""Training: the hybrid data x tensor parallel step, the data, and the `meshtron train` loop."""
