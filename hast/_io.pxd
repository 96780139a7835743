# Declarations of hast/_io.pyx
