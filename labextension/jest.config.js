// Jest setup for the frontend's unit tests: TypeScript through ts-jest, compiled to CommonJS so no ESM transform of JupyterLab is needed.
module.exports = {
  testEnvironment: 'node',
  roots: ['<rootDir>/src'],
  testMatch: ['**/__tests__/**/*.spec.ts'],
  transform: {
    '^.+\\.tsx?$': ['ts-jest', { tsconfig: 'tsconfig.test.json' }]
  }
};
