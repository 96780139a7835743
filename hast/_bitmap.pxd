# Declarations of hast/_bitmap.pyx
