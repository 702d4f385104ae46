"""The photo folder that the data tests read."""

import pytest
from photo_folder import make_photo_folder


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    """Six real photos in nested folders, plus odd-but-usable and unusable files."""
    return make_photo_folder(tmp_path_factory.mktemp("photos"))
