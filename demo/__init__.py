"""Demo and test tools, shipped with the wheel so `mqi demo` works from an installation.

Nothing in config, blocks, flows or deployments' production paths depends on
this package: it stands in for the clinic's side of the world.

    demo.synthetic_case   synthetic cases (pydicom), for the demo, tests and benchmarks
    demo.simulators       stand-ins for the interpreter, MOQUI, the RT Dose converter
                          and nvidia-smi, run as ``python3 -m demo.simulators.<tool>``
"""
