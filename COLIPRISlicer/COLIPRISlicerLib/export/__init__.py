"""Results in files: the output folder, the summary picture, DICOM SEG and SR."""
