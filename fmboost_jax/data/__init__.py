"""Input pipelines. `photos` serves crops of the photos that ship with scikit-image."""
