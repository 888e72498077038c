"""A person name with a line break (C-STORE fuzz, 10,000 inputs: 5 mutated Patient Names reached
stderr): highdicom's "The string … is unlikely to represent" warning quotes the name, and the
node's warning filter must drop it whatever characters the name holds."""

from __future__ import annotations

import warnings


def test_person_name_warning_with_a_line_break_is_not_printed(monkeypatch):
    from highdicom.valuerep import check_person_name

    from dicom_node import phi

    # pytest restores the warning filters after each test while install_log_redaction stays
    # "done": install them again for this test, whatever ran before
    monkeypatch.setattr(phi, "_done", False)
    phi.install_log_redaction()
    with warnings.catch_warnings(record=True) as caught:
        check_person_name("Qzxv\nsecret name")
        check_person_name("Qzxv\r\x0bother")
    assert not [w for w in caught if "Qzxv" in str(w.message)]
