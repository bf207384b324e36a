"""The meaning of the IR's derived ops that passes introduce (the blocked forms of feedback and scan), in
plain torch. The eager backend runs them; kernels are tested against them. Importing this package needs
only torch."""
