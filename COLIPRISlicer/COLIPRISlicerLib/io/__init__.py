"""Inputs: volumes from memory, files or DICOM folders (array in HU + IJK->RAS), and the file checks ITK does not make."""
