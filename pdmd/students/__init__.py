"""Students: LoRA roles on one frozen base (``roles``), the student folder (``folder``) and its manifest
(``manifest``), and published LoRA formats in and out (``lora_formats``)."""


class StudentError(ValueError):
    """A student folder that cannot be used; the message names the file and the problem."""
