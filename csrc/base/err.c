/* err.c: text for the error codes of the one table in edgeml.h. */
#include "em_base.h"

const char *em_strerror(int code) {
  switch (code) {
#define EM__ERR_STR(name, c, msg) case c: return msg;
    EM_ERRORS(EM__ERR_STR)
#undef EM__ERR_STR
  }
  return "unknown error";
}

const char *em_errname(int code) {
  switch (code) {
#define EM__ERR_NAME(name, c, msg) case c: return #name;
    EM_ERRORS(EM__ERR_NAME)
#undef EM__ERR_NAME
  }
  return "EUNKNOWN";
}
