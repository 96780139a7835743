# Declarations of hast/_codec.pyx
