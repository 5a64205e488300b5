"""Importers for other projects' model files (ml-mdm)."""
