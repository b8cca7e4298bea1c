"""Cache helpers: file names made from ids."""

from __future__ import annotations

from rcnn.cache import safe_filename


def test_safe_filename_keeps_plain_ids_and_separates_others():
    assert safe_filename("BloodImage_00001") == "BloodImage_00001"
    assert safe_filename("a.b-c_d") == "a.b-c_d"
    odd = [safe_filename(x) for x in ("a/b", "a b", "a?b", ".hidden", "", "x/" * 100)]
    assert len(set(odd)) == len(odd)  # the hash keeps ids that map to the same characters apart
    for name in odd:
        assert name and not name.startswith(".") and "/" not in name and " " not in name and len(name) <= 89
    assert odd[0].startswith("a_b-") and odd[3].startswith("hidden-")
