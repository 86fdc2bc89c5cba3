/* edgeml_trainer.h: the Trainer role in C (included by edgeml.h through
 * edgeml_roles.h; include edgeml.h, not this). Being written. */
#ifndef EDGEML_TRAINER_H
#define EDGEML_TRAINER_H
#endif
