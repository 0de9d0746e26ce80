"""One run end to end: its stages, the artefact cache shared by a sweep, the run dir and resumption."""
