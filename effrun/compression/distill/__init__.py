"""The distill stage: compression/distill=<method>.

kd       Hinton logit distillation (temperature, alpha) from a teacher: the previous stage's
         model or an artifact; the student a model option (e.g. resnet20) or the previous model
feature  kd plus hint losses on named layers through learned 1x1 projections (FitNets)

compare_scratch=true also trains the student without a teacher for the same epochs and reports
both accuracies.
"""
