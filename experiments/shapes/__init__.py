"""The offline shapes world: a procedural captioned dataset, a judge, a small LDM trained on it."""
