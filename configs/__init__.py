"""YAML configs shipped with microdit: the embedded demo and the paper's four phases."""
