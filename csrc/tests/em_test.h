/* em_test.h: a minimal test harness for the C unit tests (one executable
 * per module; exit status is the number of failed checks). */
#ifndef EM_TEST_H
#define EM_TEST_H
#include <stdio.h>
#include <stdlib.h>

static int em_t_fail, em_t_pass;
#define CHECK(cond)                                                         \
  do {                                                                      \
    if (cond) em_t_pass++;                                                  \
    else {                                                                  \
      em_t_fail++;                                                          \
      fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
    }                                                                       \
  } while (0)
#define CHECK_EQ(a, b)                                                      \
  do {                                                                      \
    long long _a = (long long)(a), _b = (long long)(b);                     \
    if (_a == _b) em_t_pass++;                                              \
    else {                                                                  \
      em_t_fail++;                                                          \
      fprintf(stderr, "%s:%d: CHECK_EQ failed: %s = %lld, %s = %lld\n", __FILE__, __LINE__, #a, _a, #b, _b); \
    }                                                                       \
  } while (0)
#define RUN(fn)                                                             \
  do {                                                                      \
    int _f = em_t_fail;                                                     \
    fn();                                                                   \
    printf("%s %s\n", em_t_fail == _f ? "ok  " : "FAIL", #fn);             \
  } while (0)
#define DONE()                                                              \
  do {                                                                      \
    printf("%d checks passed, %d failed\n", em_t_pass, em_t_fail);          \
    return em_t_fail ? 1 : 0;                                               \
  } while (0)
#endif
