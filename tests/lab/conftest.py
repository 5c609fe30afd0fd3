"""The lab's guest-side suite runs only inside the lab guest (tests/lab/run), never on the host."""

collect_ignore = ["guest"]
