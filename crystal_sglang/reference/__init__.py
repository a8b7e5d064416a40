"""The transformers reference path: any policy applied inside `generate()` or a teacher-forced replay."""
