// The training kernels as one translation unit: the build compiles this file and cbam_infer.cpp side by side
// (two compiler jobs on a 2-core machine instead of four; each file spends most of its time in torch's headers).
#include "cbam_train.cpp"
#include "cbam_train_cl.cpp"
#include "cbam_bn_train.cpp"
#include "cbam_bn_train_cl.cpp"
