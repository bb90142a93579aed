"""The records the kernel and user space exchange: their layouts, declared once (``layout``: the C
text the BPF programs include and the Python ``struct`` formats), and their decoders (``records``:
bytes -> typed records). Pure: the kernel stage (``busted/ebpf``) compiles with these layouts,
the pipeline decodes with them, and neither needs the other."""
